"""The MLproject's entry points, one module each with a thin `run()`: they read and write
artifacts and runs through the layers below (learning, serving, tracking, data), never the CLI."""
