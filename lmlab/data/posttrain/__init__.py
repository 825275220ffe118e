"""Post-training data: chat format, instruction/preference/prompt records, verifiable tasks and their DataModules."""
