"""petal_fast.quality"""
