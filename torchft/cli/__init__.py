"""The `tune` command line: one module per subcommand (run, ls, cp, cat, validate, download), entry point in main."""
