"""The `tff-privseg` command line: a thin click layer over `tff_privseg`."""
