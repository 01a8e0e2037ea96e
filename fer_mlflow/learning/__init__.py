"""What training needs and serving does not: network builders, the training loop's parts, tf.data
inputs, distribution over workers, the sweep's search space and study storage."""
