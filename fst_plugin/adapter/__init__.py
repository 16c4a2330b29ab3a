"""BackdoorBench's face (none of its code): the defense classes its launchers run, and the launcher itself."""
