"""Built-in aggregators, one module each. Drop a module of your own here to add one."""
