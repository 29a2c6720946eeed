"""treeops command line: wires training, export, server, loadtest and monitoring together."""
