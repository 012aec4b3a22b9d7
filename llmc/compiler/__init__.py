"""Pure compiler functions: hardware, params, flops, memory, scaling, search, diagnostics, render.

Nothing in this package imports torch (tests check it with torch blocked in sys.modules).
"""
