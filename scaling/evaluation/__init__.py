"""Sample-quality evaluation, one module per job:

- `metrics`: the exact definitions of ADM's metrics on feature arrays (Frechet distance, Inception Score,
  precision and recall), numpy only;
- `npz`: ADM's sample and reference batch files and image folders;
- `inception`: ADM's suite with the FID Inception (FID, sFID, IS, precision, recall of a sample batch);
- `fd_fashion_cnn`: FD-FashionCNN and its companions for CPU-sized studies;
- `sampling`: drawing samples from a DiT, sharded over devices and hosts;
- `in_training`: the evaluator a run calls at its evaluation steps (`Evaluator`, `build_evaluator`).
"""
