"""The control database: jobs and their leases, the backup index, accounts, drills and usage."""
