"""Stage functions: params in, a stage's files out. Entry points (CLI, Prefect flows) call these;
the library below never imports them. ``data`` holds the data stages, ``training`` the model ones."""
