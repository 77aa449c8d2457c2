"""petal_fast.eval"""
