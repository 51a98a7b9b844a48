"""Built-in scalebio plugins, installed as the ``scalebio_plugins`` package and registered
through the ``scalebio`` entry-point group exactly like third-party plugins."""
