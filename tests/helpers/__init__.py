"""Helpers shared by the test folders (importable as ``helpers``: pyproject puts tests/ on the path).

Fixtures live in the conftest.py of the folder that uses them; plain functions and constants live
here, so no test module imports a conftest or another test module.
"""
