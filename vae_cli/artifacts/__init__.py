"""What a run leaves on disk and how to read it back: the weights file, picture grids, plots, report.html."""
