"""usfm_core.evaluate"""
