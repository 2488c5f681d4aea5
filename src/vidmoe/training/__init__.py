"""vidmoe.training"""
