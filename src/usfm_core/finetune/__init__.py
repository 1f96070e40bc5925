"""usfm_core.finetune"""
