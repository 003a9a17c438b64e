"""DeepCluster: unsupervised learning of convnet features (Caron et al., ECCV 2018).

The method alternates, once per epoch, between clustering the network's features with
k-means and training the network on the cluster assignments as pseudo-labels. See
``deepcluster.train.train`` for the loop and ``README.md`` for the commands.
"""

__version__ = "0.1.0"
