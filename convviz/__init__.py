"""convviz: reproduce and extend Zeiler & Fergus (2014), Visualizing and Understanding CNNs."""

__version__ = "0.1.0"
