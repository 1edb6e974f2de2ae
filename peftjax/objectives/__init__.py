"""Training objectives and data corruptions: UL2's mixture of denoisers (`ul2`)."""
