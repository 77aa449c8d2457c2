"""petal_fast.models"""
