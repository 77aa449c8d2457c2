"""petal_fast.data"""
