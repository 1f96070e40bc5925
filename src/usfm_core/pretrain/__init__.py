"""usfm_core.pretrain"""
