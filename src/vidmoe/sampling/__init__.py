"""vidmoe.sampling"""
