"""Reading runs and comparing them: tables, confidence intervals and plots of a sweep."""
