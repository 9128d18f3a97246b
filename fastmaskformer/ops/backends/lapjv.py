"""The lapjv package as a backend of linear_sum_assignment."""
