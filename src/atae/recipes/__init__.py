"""Training recipes as TOML files (read by ``atae.train.load_recipe``); see each file's description."""
