# score stage (rules added by its issue).
