"""vidmoe.models"""
