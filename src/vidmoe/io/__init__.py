"""vidmoe.io"""
