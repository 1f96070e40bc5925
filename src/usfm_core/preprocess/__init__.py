"""usfm_core.preprocess"""
