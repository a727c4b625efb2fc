class DbtUsageException(Exception):
    """dbt's: a command line dbt refuses (the driver prints it, as the `dbt` command does)."""
