"""The ways in: command line, batch driver, web app."""
