"""Code that runs inside Triton: the Python-backend model and treeops' C backend.

Nothing here imports training, export or server: export copies or compiles these files into
version folders, and Triton loads them from there.
"""
