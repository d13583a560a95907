"""torchft test suite (a package, so test modules import as tests.<area>.<module> and never shadow torchft or recipes)."""
