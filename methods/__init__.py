"""Built-in distillation methods: one file per method, imported as ``kdbench.methods.<stem>``.

Every module here is imported by the method registry on first use; a new file is all it takes to add one.
"""
