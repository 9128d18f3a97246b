"""The native (C++/CUDA) batched linear assignment solver as a backend of linear_sum_assignment."""
