"""Built-in study configs: `fmnist` (miniature DiTs on Fashion-MNIST) and `imagenet256` (the paper's runs)."""
