# cluster stage (rules added by its issue).
