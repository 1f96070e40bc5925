"""usfm_core.models"""
