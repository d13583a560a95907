"""Recipe scripts shipped with torchft (installed as ``torchft._recipes``)."""
