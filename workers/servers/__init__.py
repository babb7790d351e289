"""Server snapshots: EBS volume sets, file-tree snapshots, and their retention."""
