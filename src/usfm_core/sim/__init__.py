"""usfm_core.sim"""
