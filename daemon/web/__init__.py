"""The live browser viewer (`cryoptycho view`): server and static page."""
