"""The passport store: passports and study metadata in a database (SQLite file or PostgreSQL).

``ctpassport store add|list|show|register`` -> :class:`ctpassport.store.db.PassportStore`.
"""
