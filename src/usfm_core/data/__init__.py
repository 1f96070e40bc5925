"""usfm_core.data"""
