"""usfm_core.io"""
