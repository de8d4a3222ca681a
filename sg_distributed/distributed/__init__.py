"""Process groups and the accounting of what crosses between ranks."""
