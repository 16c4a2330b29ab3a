"""Default defense yamls shipped with backdoorbench-fst (package data)."""
