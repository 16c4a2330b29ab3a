"""A tuning defense as this package runs it, whoever calls it: its settings (config), the shipped yamls, where
models and data come from (backend), the input pipeline and the runner (prepare, then run)."""
