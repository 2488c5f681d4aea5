"""vidmoe.world"""
